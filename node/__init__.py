"""ainode: an AI node beside a hospital PACS that reads chest CT."""

__version__ = "0.1.0"
