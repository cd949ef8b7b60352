"""atlas_p2p package."""
