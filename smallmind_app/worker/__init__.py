"""The only bridge to the engine: the worker on its QThread, the GUI thread's client, what they share."""
