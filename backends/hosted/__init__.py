"""What every hosted provider's backend shares, whatever its SDK, one module per job:

- `env`: `.env` reading and the `Scrubber` that keeps keys out of every text shown or stored;
- `errors`: the SDK error taxonomy (`SdkErrors`) and our own (`HostedRequestError`, `ProviderUnavailable`);
- `retry`: backoff, `ProviderWatch` (is the provider answering? how hard are we retrying?) and `RetryPolicy`,
  the one retry layer (clients are built with `max_retries=0`);
- `records`: the durable bookkeeping that keeps uploads and jobs idempotent across crashes;
- `names`: names and markers on the server, listings, losses in events;
- `chat`, `chat_files`, `rate_limit`: concurrent chat, training-file checks and the request limiter;
- `backend`: `HostedBackend`, the base the openai and together backends build on.
"""
