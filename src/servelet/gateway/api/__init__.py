"""One module per API family; each translates its wire format to and from the internal request."""
