"""The node agent: enrols once, long-polls the control plane, serves workers on a unix socket.

Imports nothing of the server (no FastAPI, no SQLAlchemy): fast cold start, small footprint.
"""
