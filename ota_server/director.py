"""Signing director documents with the server's online director key."""

from __future__ import annotations

from securesystemslib.signer import Signer

from edgec.director import DirectorDocument, DirectorSignature, SignedDirectorDocument, canonical

__all__ = ["sign_document"]


def sign_document(document: DirectorDocument, signer: Signer) -> SignedDirectorDocument:
    signature = signer.sign(canonical(document))
    return SignedDirectorDocument(
        signed=document, signatures=[DirectorSignature(keyid=signature.keyid, sig=signature.signature)]
    )
