"""A Kubernetes control plane, a stand-in kubelet and a plug to pull, for the tests."""
