"""Members: the people (openid/unionid) a tenant knows."""
