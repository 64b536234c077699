"""medimb.explain"""
