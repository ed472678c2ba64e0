"""Body composition on the L3 slice: SMA, IMAT, VAT, SAT."""
