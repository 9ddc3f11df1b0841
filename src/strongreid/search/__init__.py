"""Person search across cameras: a vector store of crops, ingest, and a web service."""
