"""The controller: the sessions API (control plane) and the VNC bridge (data plane).

``store`` persists users, sessions and transitions in SQLite; ``sessions`` runs each session's
lifecycle through a driver; ``events`` fans state changes out to SSE streams; ``identity``
decides who a request is; ``login`` is the login URL's sign-in; ``app`` is the FastAPI
application; ``bridge`` relays RFB between browser WebSockets and VNC servers;
``server`` runs it all in one event loop behind a gateway.
"""
