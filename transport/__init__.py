"""The wire: how ATLAS nodes talk (never imports torch).

- tensors.py   wire dtypes, limits, RawTensor (bfloat16 and friends as bytes)
- schema.py    field schemas derived from annotations, and their checks
- messages.py  one frozen dataclass per message type, MESSAGE_TYPES, Envelope
- codec.py     encode/decode: msgpack header + zero-copy tensor frames, DecodeError
- pump.py      drives a plain ZeroMQ socket from the asyncio loop
- rpc.py       RpcServer (ROUTER) / RpcClient (DEALER per peer), RpcError, RpcTimeout
- link.py      emulated bandwidth, latency and loss
- units.py     parse_size / parse_rate for the command line
- security.py  optional CurveZMQ keypairs and allow-lists
- samples.py   valid random messages built from the schemas (tests, benchmarks)
"""
