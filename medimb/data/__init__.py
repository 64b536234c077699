"""medimb.data"""
