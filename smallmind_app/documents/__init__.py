"""Documents: libraries of files the tabs can cite (Tools → Documents…, a tab's Documents button,
numbered citations under a reply that open the passage in a side panel). The indexing and the
retrieval run in ``worker/documents.py``; ``feature.py`` wires them to the window."""
