"""Where certificates, ACME accounts, orders, locks and HTTP-01 answers live: the contract
(``contract``), the state directory (``files``), memory (``memory``, for tests) and Redis or
Valkey shared by a cluster of replicas."""
