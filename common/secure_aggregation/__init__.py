"""Secure aggregation (SecAgg+, Bell et al. CCS 2020): what a site and the coordinator
both need, the parameters of a round, the messages of its four stages, the cryptography
and the masks. The site's stages are client.secure_aggregation, the coordinator's
server.secure_aggregation."""
