# neureg's images, one file, two targets (docker compose builds both):
#   worker   lean: the official PyTorch CUDA runtime image + neureg with the S3 client, at the locked versions
#            (constraints.txt); no test extras, no Jupyter. deploy/apptainer/neureg-worker.def builds the same
#            thing for clusters.
#   jupyter  the worker image + JupyterLab, for the lab's notebooks.
# Credentials come from the environment at run time, never from here; .dockerignore keeps secrets, virtual
# environments, data and .git out of the build context.
#
# The base image's torch must be the locked one (tests/test_deployment.py checks the tag against constraints.txt),
# so pip keeps it instead of downloading another 5 GB.
ARG PYTORCH_IMAGE=pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime

FROM ${PYTORCH_IMAGE} AS worker
WORKDIR /opt/neureg
# The whole build context (.dockerignore keeps secrets, environments and data out); the packages installed are
# the ones setup.py finds, so there is no list of modules to keep here.
COPY . ./
RUN pip install --no-cache-dir ".[s3]" -c constraints.txt \
 && useradd --create-home --uid 1000 neureg
USER neureg
ENV NEUREG_BACKEND=server
CMD ["neureg", "worker"]

FROM worker AS jupyter
USER root
RUN pip install --no-cache-dir "jupyterlab==4.6.6" -c constraints.txt
USER neureg
CMD ["jupyter", "lab", "--ip=0.0.0.0", "--port=8888", "--no-browser", "--notebook-dir=/opt/neureg/notebooks"]
