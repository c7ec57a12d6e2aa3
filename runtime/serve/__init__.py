"""`cli.py serve`: a bundle behind an HTTP API on Ray Serve, one replica per GPU (CPU replicas otherwise).

    command.py   the click command: start Ray (loopback) or join a cluster, deploy, drain on Ctrl-C/SIGTERM
    app.py       the Ray side: the job board actor, the Generator replicas and the HTTP front (FastAPI)
    jobs.py      the job table (queue limit, states, progress, results, retention), plain Python
    api.py       JSON bodies <-> GenerationRequest, error bodies, the model card
    resident.py  engines kept loaded between jobs when the whole bundle fits the memory budget

Only command.py is imported by the CLI; app.py (which imports ray and fastapi) once Ray is up.
"""
