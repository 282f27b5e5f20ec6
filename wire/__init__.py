"""Wire conversion and RPC plumbing: generated stubs, codecs, the gRPC server builder."""
