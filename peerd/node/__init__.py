"""The I/O glue: a node's listener and dials, one session task pair per
connection, one driver per content that runs the engine's decisions over
real sockets, the tracker client and the rate limiters."""
