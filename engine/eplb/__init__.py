"""Expert-parallel load balancing: where each MoE layer's expert replicas live (``policy``), the
logical -> physical map the dispatch reads (``placement``), the ``--eplb-config`` flags (``config``) and the
live move of expert weights between ranks (``rebalance``)."""
