"""The node agent: enrols once, long-polls the control plane, serves workers on a unix socket.

Imports nothing of the server (no FastAPI, no SQLAlchemy), nor the operator CLI (click, rich), nor
httpx (the agent's HTTP is its own: ``http1``, ``upstream``): fast cold start, small footprint
(``bench/agent_footprint.py``).
"""
