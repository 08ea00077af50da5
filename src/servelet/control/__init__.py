"""Control plane: endpoints, their variants and instances, and routing an invocation to one of them."""
