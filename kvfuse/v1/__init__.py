"""Generated gRPC/protobuf stubs of protos/kvfuse/v1 (run `make proto`; never edit by hand)."""
