"""The local DagsHub-compatible test server (``streamloader serve DIR``).

It serves a folder as a one-branch DagsHub repository, speaking the subset of DagsHub's REST API listed in
:mod:`.handler` well enough for the official ``dagshub`` client, with fault knobs for tests::

    from streamloader.server import DagsHubServer, ServerFaults, ServerProcess

    with DagsHubServer("/tmp/repo", token="t0k", faults=ServerFaults(latency=0.05)) as srv:
        print(srv.repo_url)                      # http://127.0.0.1:PORT/user/repo
        srv.faults.fail_first = {"data/a.jpg": 2}

``DagsHubServer(..., dagshub_like=DagsHubLike())`` answers the way dagshub.com really does (server/mode.py).

It is a test and demo tool: it binds 127.0.0.1 by default and keeps no history (every commit sha it ever issued
serves the folder as it is now).
"""
from streamloader.server.app import DagsHubServer
from streamloader.server.faults import ServerFaults
from streamloader.server.mode import DagsHubLike
from streamloader.server.process import ServerProcess
from streamloader.server.synth import SyntheticFolder, write_synthetic_labels

__all__ = ["DagsHubServer", "DagsHubLike", "ServerFaults", "ServerProcess", "SyntheticFolder", "write_synthetic_labels"]
