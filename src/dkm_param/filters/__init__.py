"""Filter clustering for thinner networks: C-SGD, the fx routes channels take, and the surgery that thins."""
