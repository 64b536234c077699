"""medimb.networks"""
