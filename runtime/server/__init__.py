"""The HTTP server: SGLang's native API and the OpenAI API over one Engine. Imports no torch.

    sgl serve --model-path default --port 30000          # or: python -m sgl.launch_server ...

    from sgl.runtime.server import create_app, launch_server
"""

from sgl.runtime.server.app import create_app
from sgl.runtime.server.launch import launch_server, serve

__all__ = ["create_app", "launch_server", "serve"]
