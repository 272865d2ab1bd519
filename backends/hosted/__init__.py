"""What every hosted provider's backend shares, whatever its SDK, one module per job:

- `env`: `.env` reading and the `Scrubber` that keeps keys out of every text shown or stored;
- `errors`: the SDK error taxonomy (`SdkErrors`) and our own (`HostedRequestError`, `ProviderUnavailable`);
- `retry`: backoff, `ProviderWatch` (is the provider answering? how hard are we retrying?) and `RetryPolicy`,
  the one retry layer (clients are built with `max_retries=0`);
- `records`: the durable bookkeeping that keeps uploads and jobs idempotent across crashes;
- `names`: names and markers on the server, listings, losses in events;
- `chat`, `chat_files`, `rate_limit`: concurrent chat, training-file checks and the request limiter;
- `clients`, `jobs`, `backend`: the bases the openai and together modules build on (`HostedClients`: the key and
  the SDK clients; `HostedJobs`: files and finetuning jobs; `HostedBackend`: the backend), each owning the shared
  flow, so that a provider supplies only its API calls, payloads and what it alone does.
"""
