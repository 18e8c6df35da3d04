"""The Ray Serve application: HTTP ingress, generator, retriever + knowledge store, feedback store."""
