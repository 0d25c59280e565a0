"""Generated Protobuf and gRPC code for connmeta.v1 (scripts/gen; never edit by hand)."""
