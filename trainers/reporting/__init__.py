"""What a person reads: RUN/report.html (`report`), `bmvae compare` of several runs (`compare`),
and the PNGs both embed (`plots`). Reads metrics.json through `evaluation.metrics.Metrics`."""
