"""Remote engines: endpoints and their API keys, Settings → Engines, the tab's engine picker."""
