"""The ground layer of the MPC side: identities, secure links, keyed randomness.

* :mod:`.identity` — per-party keys and pinned self-signed certificates.
* :mod:`.channel` — mutually authenticated TLS 1.3 links, framing and the desync detector.
* :mod:`.prg` — AES-128-CTR pairwise streams and OS-CSPRNG local randomness.
* :mod:`.secure_comm` — CrypTen's communicator and random helpers moved onto the above.

Nothing here imports CrypTen at import time.
"""
