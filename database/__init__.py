"""The database and the object store: settings, the embedded server, connecting, store files and digests."""
