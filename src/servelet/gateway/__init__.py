"""The gateway: one FastAPI app speaking every API family, forwarding to instances over Unix sockets."""
