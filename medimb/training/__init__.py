"""medimb.training"""
