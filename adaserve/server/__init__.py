"""The OpenAI-compatible server: ``create_app`` (app.py) over an ``EngineThread`` (engine_thread.py)
built by ``build_engine`` (build.py); ``adaserve serve`` (cli/serve_cmd.py) wires them up."""

from adaserve.server.app import ServerConfig, create_app
from adaserve.server.engine_thread import EngineThread

__all__ = ["EngineThread", "ServerConfig", "create_app"]
