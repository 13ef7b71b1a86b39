"""The multi-region router: one address in front of moray Serve endpoints in several regions.

    moray route --config regions.yaml [--host H] [--port P]

    config.py    regions.yaml (router settings, the regions), validated with pydantic
    breaker.py   a circuit breaker per region (closed -> open -> half-open -> closed)
    region.py    what the router knows of a region: breaker, latency EWMA, load, errors, why
    probe.py     the controller: each region's /health and /metrics, every probe_interval_s
    policy.py    which regions a request tries, in order: session, prefix, preferred, load
    upstream.py  one attempt at a region, retries within a deadline, hedging (off by default)
    stream.py    relaying a stream, resuming it at another region when its region is lost
    metrics.py   the router's Prometheus metrics, per region
    app.py       the FastAPI app: the OpenAI routes, /health, /regions, /metrics

It speaks HTTP to the regions and imports no engine code (the lent GPU machine's rule for
moray.model holds here too: no torch, no Ray); from moray.serve.openai it takes the keys,
the error object and the ASGI guard, so clients see the endpoint's API, keys and errors.
"""
