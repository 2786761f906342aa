"""The main window: menus, status bar, dialogs, the router of the worker's signals, the theme."""
