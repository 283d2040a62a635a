"""remote-cli: isolated command-line sessions, streamed live to the browser over noVNC."""

__version__ = "0.1.0"
