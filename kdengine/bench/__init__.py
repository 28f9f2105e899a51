"""The benchmark harness behind ``kdengine bench``: :mod:`.ops` (the fused ops and ADMLoss against
Algorithm 1), :mod:`.data` (the FFCV loader against PIL + DataLoader), :mod:`.timing` and
:mod:`.results` (where rows go and the provenance they carry)."""
