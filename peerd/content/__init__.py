"""What is shared and who vouches for it: identities (Ed25519 keys), chunk
hashing, the signed manifest, and the crash-safe chunk store on disk."""
