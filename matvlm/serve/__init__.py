"""`matvlm serve`: an OpenAI-compatible HTTP server with continuous batching and a chat page."""

from .app import create_app
from .model import PromptError, ServedModel, Turn
from .schema import ApiError, ChatRequest, parse_chat_request
from .server import serve_command

__all__ = ["ApiError", "ChatRequest", "PromptError", "ServedModel", "Turn", "create_app", "parse_chat_request",
           "serve_command"]
