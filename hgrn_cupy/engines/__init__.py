"""The engines: one module per engine, each turning a planned call into kernel launches."""
