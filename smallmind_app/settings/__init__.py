"""The app's settings: the dataclass, its file, the settings dialog, system prompt presets."""
