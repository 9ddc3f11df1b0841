"""Person search across cameras: a vector store of crops, ingest, and a web service."""

# The embedded gallery store registers itself in search.store.STORES on import; importing it
# here (not from store.py, which it builds on) makes it known wherever a store is opened.
from strongreid.search import faiss_store  # noqa: F401
