"""When to renew the proxy's certificate: at half its life, without I/O.

Half-life leaves the other half for retries when the control plane is away, which is
the whole point of renewing early. The life counts from when the certificate became
ours, not from its `notBefore`: a CA back-dates `notBefore` against clock skew, and a
short-lived certificate counted from there would look half-spent on arrival (and be
renewed again, and again).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CertificateTimes:
    """The validity of a certificate, as Unix times, and when we got it."""

    not_before: float
    not_after: float
    # when it was issued to us (a cached one: when it was written); None if unknown
    obtained: float | None = None

    @classmethod
    def from_pem(cls, pem: bytes, obtained: float | None = None) -> CertificateTimes:
        """The first certificate of a PEM chain. Raises ValueError if there is none."""
        from cryptography import x509

        leaf = x509.load_pem_x509_certificates(pem)[0]
        return cls(
            leaf.not_valid_before_utc.timestamp(), leaf.not_valid_after_utc.timestamp(), obtained
        )

    @property
    def start(self) -> float:
        """Where its life counts from."""
        if self.obtained is None:
            return self.not_before
        return max(self.not_before, min(self.obtained, self.not_after))

    def renew_at(self) -> float:
        """The moment half its life has passed."""
        return self.start + (self.not_after - self.start) / 2

    def renewal_delay(self, now: float) -> float:
        """Seconds from `now` until renewal is due (0: due already)."""
        return max(0.0, self.renew_at() - now)

    def usable(self, now: float) -> bool:
        """Whether it can still be presented at `now`."""
        return self.not_before <= now < self.not_after
