"""trio-chat: a chat-room server on trio's structured concurrency."""

from trio_chat.config import Config
from trio_chat.server import ChatServer, serve

__all__ = ["ChatServer", "Config", "serve"]
__version__ = "0.2.0"
