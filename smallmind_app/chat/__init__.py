"""A conversation tab: its conversation, the transcript, the prompt box, code blocks, versions,
attachments, the chat's own settings, the tab widget of all conversations."""
