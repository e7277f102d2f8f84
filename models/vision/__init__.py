"""Networks, the VOneBlock, the similarity regularizer, datasets and the training loop."""
