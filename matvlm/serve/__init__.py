"""`matvlm serve`: an OpenAI-compatible HTTP server with continuous batching and a chat page."""

from matvlm.serve.app import create_app
from matvlm.serve.model import PromptError, ServedModel, Turn
from matvlm.serve.schema import ApiError, ChatRequest, parse_chat_request
from matvlm.serve.server import serve_command

__all__ = ["ApiError", "ChatRequest", "PromptError", "ServedModel", "Turn", "create_app", "parse_chat_request",
           "serve_command"]
