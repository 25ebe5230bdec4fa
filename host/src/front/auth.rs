//! The Auth service (etcdctl `user`, `role`, `auth`) over [`crate::auth::Auth`], and the
//! checks the other services make of a request's user: what each request needs of its keys,
//! as etcd 3.4 checks it.

use std::sync::Arc;

use etcd_client::proto as pb;
use tonic::{Request, Response, Status};

use super::maintenance::member_id;
use crate::auth::{Access, Auth, AuthError, Need, Permission, Who, hash_password};
use crate::gate::Gateway;

/// The generated etcd Auth messages and service trait.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    /// `etcdserverpb`: the Auth service.
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
    /// `authpb`: permissions and user options.
    pub mod authpb {
        tonic::include_proto!("authpb");
    }
}

use proto::authpb;
use proto::etcdserverpb as apb;

/// Refuses `txn` unless `who` may read every compare's keys and do each op of both branches.
pub fn check_txn(auth: &Auth, who: &Who, txn: &pb::PbTxnRequest) -> Result<(), Status> {
    for compare in &txn.compare {
        auth.require(who, Need::Read, &compare.key, &compare.range_end)?;
    }
    for op in txn.success.iter().chain(&txn.failure) {
        match &op.request {
            Some(pb::PbTxnOpRequest::RequestRange(range)) => auth.require(who, Need::Read, &range.key, &range.range_end)?,
            Some(pb::PbTxnOpRequest::RequestPut(put)) => check_put(auth, who, put)?,
            Some(pb::PbTxnOpRequest::RequestDeleteRange(delete)) => check_delete(auth, who, delete)?,
            Some(pb::PbTxnOpRequest::RequestTxn(inner)) => check_txn(auth, who, inner)?,
            None => {}
        }
    }
    Ok(())
}

/// A put needs WRITE on its key, and READ too when it asks for the previous value.
pub fn check_put(auth: &Auth, who: &Who, put: &pb::PbPutRequest) -> Result<(), Status> {
    auth.require(who, Need::Write, &put.key, b"")?;
    if put.prev_kv {
        auth.require(who, Need::Read, &put.key, b"")?;
    }
    Ok(())
}

/// A delete needs WRITE on its range, and READ too when it asks for the deleted values.
pub fn check_delete(auth: &Auth, who: &Who, delete: &pb::PbDeleteRequest) -> Result<(), Status> {
    auth.require(who, Need::Write, &delete.key, &delete.range_end)?;
    if delete.prev_kv {
        auth.require(who, Need::Read, &delete.key, &delete.range_end)?;
    }
    Ok(())
}

/// The Auth service.
pub struct AuthService {
    gate: Arc<Gateway>,
    auth: Arc<Auth>,
    addr: std::net::SocketAddr,
}

impl AuthService {
    /// Auth over `auth`, answering with headers of `gate`'s home group, served at `addr`.
    pub fn new(gate: Arc<Gateway>, auth: Arc<Auth>, addr: std::net::SocketAddr) -> Self {
        AuthService { gate, auth, addr }
    }

    async fn header(&self) -> Result<Option<pb::PbResponseHeader>, Status> {
        let mut header = self.gate.home().status().await?.header;
        if let Some(header) = header.as_mut() {
            header.member_id = member_id(&self.addr);
        }
        Ok(header)
    }

    /// Management needs the root role once auth is on.
    async fn admin<T>(&self, request: &Request<T>) -> Result<Who, Status> {
        let who = self.auth.who(request.metadata()).await?;
        self.auth.require_admin(&who)?;
        Ok(who)
    }

    async fn change(&self, change: impl FnMut(&mut crate::auth::AuthRecord) -> Result<(), AuthError>) -> Result<Option<pb::PbResponseHeader>, Status> {
        self.auth.change(change).await?;
        self.header().await
    }
}

/// The bcrypt hash a user add or password change stores: the client's own hash, or one made
/// of its password.
async fn password_hash(password: &str, hashed: &str) -> Result<String, Status> {
    if !hashed.is_empty() {
        hashed.parse::<bcrypt::HashParts>().map_err(|e| {
            Status::invalid_argument(format!("hashedPassword is not a bcrypt hash ({e}); send the password itself instead"))
        })?;
        return Ok(hashed.to_string());
    }
    if password.is_empty() {
        return Err(Status::invalid_argument(
            "the password is empty; give one, or add the user without a password (etcdctl user add --no-password)",
        ));
    }
    Ok(hash_password(password.to_string()).await?)
}

#[tonic::async_trait]
impl apb::auth_server::Auth for AuthService {
    async fn auth_enable(&self, request: Request<apb::AuthEnableRequest>) -> Result<Response<apb::AuthEnableResponse>, Status> {
        if self.auth.enabled() {
            // Already on: only root may ask, and nothing changes (as etcd answers).
            self.admin(&request).await?;
            return Ok(Response::new(apb::AuthEnableResponse { header: self.header().await? }));
        }
        let header = self.change(|record| record.enable()).await?;
        tracing::info!("etcd auth enabled through aq");
        Ok(Response::new(apb::AuthEnableResponse { header }))
    }

    async fn auth_disable(&self, request: Request<apb::AuthDisableRequest>) -> Result<Response<apb::AuthDisableResponse>, Status> {
        self.admin(&request).await?;
        let header = self
            .change(|record| {
                record.enabled = false;
                Ok(())
            })
            .await?;
        tracing::info!("etcd auth disabled through aq");
        Ok(Response::new(apb::AuthDisableResponse { header }))
    }

    async fn auth_status(&self, request: Request<apb::AuthStatusRequest>) -> Result<Response<apb::AuthStatusResponse>, Status> {
        // Open, as in etcd; a token it carries must still be good.
        self.auth.who(request.metadata()).await?;
        Ok(Response::new(apb::AuthStatusResponse {
            header: self.header().await?,
            enabled: self.auth.enabled(),
            auth_revision: self.auth.revision().max(0) as u64,
        }))
    }

    async fn authenticate(&self, request: Request<apb::AuthenticateRequest>) -> Result<Response<apb::AuthenticateResponse>, Status> {
        let request = request.into_inner();
        let token = self.auth.authenticate(&request.name, &request.password).await.inspect_err(|e| {
            if *e == AuthError::AuthFailed {
                tracing::info!(user = %request.name, "etcd authentication failed");
            }
        })?;
        Ok(Response::new(apb::AuthenticateResponse { header: self.header().await?, token }))
    }

    async fn user_add(&self, request: Request<apb::AuthUserAddRequest>) -> Result<Response<apb::AuthUserAddResponse>, Status> {
        self.admin(&request).await?;
        let request = request.into_inner();
        let no_password = request.options.as_ref().is_some_and(|o| o.no_password);
        let hash = if no_password { None } else { Some(password_hash(&request.password, &request.hashed_password).await?) };
        let header = self.change(|record| record.add_user(&request.name, hash.clone())).await?;
        Ok(Response::new(apb::AuthUserAddResponse { header }))
    }

    async fn user_get(&self, request: Request<apb::AuthUserGetRequest>) -> Result<Response<apb::AuthUserGetResponse>, Status> {
        let who = self.auth.who(request.metadata()).await?;
        let name = &request.get_ref().name;
        // A user may look at itself, as in etcd.
        if who.user() != Some(name.as_str()) {
            self.auth.require_admin(&who)?;
        }
        let record = self.auth.record();
        let user = record.users.get(name).ok_or(AuthError::UserNotFound)?;
        Ok(Response::new(apb::AuthUserGetResponse { header: self.header().await?, roles: user.roles.iter().cloned().collect() }))
    }

    async fn user_list(&self, request: Request<apb::AuthUserListRequest>) -> Result<Response<apb::AuthUserListResponse>, Status> {
        self.admin(&request).await?;
        let users = self.auth.record().users.into_keys().collect();
        Ok(Response::new(apb::AuthUserListResponse { header: self.header().await?, users }))
    }

    async fn user_delete(&self, request: Request<apb::AuthUserDeleteRequest>) -> Result<Response<apb::AuthUserDeleteResponse>, Status> {
        self.admin(&request).await?;
        let name = request.into_inner().name;
        let header = self.change(|record| record.delete_user(&name)).await?;
        Ok(Response::new(apb::AuthUserDeleteResponse { header }))
    }

    async fn user_change_password(
        &self,
        request: Request<apb::AuthUserChangePasswordRequest>,
    ) -> Result<Response<apb::AuthUserChangePasswordResponse>, Status> {
        self.admin(&request).await?;
        let request = request.into_inner();
        if !self.auth.record().users.contains_key(&request.name) {
            return Err(AuthError::UserNotFound.into());
        }
        let hash = password_hash(&request.password, &request.hashed_password).await?;
        let header = self.change(|record| record.change_password(&request.name, hash.clone())).await?;
        Ok(Response::new(apb::AuthUserChangePasswordResponse { header }))
    }

    async fn user_grant_role(
        &self,
        request: Request<apb::AuthUserGrantRoleRequest>,
    ) -> Result<Response<apb::AuthUserGrantRoleResponse>, Status> {
        self.admin(&request).await?;
        let request = request.into_inner();
        let header = self.change(|record| record.grant_role(&request.user, &request.role)).await?;
        Ok(Response::new(apb::AuthUserGrantRoleResponse { header }))
    }

    async fn user_revoke_role(
        &self,
        request: Request<apb::AuthUserRevokeRoleRequest>,
    ) -> Result<Response<apb::AuthUserRevokeRoleResponse>, Status> {
        self.admin(&request).await?;
        let request = request.into_inner();
        let header = self.change(|record| record.revoke_role(&request.name, &request.role)).await?;
        Ok(Response::new(apb::AuthUserRevokeRoleResponse { header }))
    }

    async fn role_add(&self, request: Request<apb::AuthRoleAddRequest>) -> Result<Response<apb::AuthRoleAddResponse>, Status> {
        self.admin(&request).await?;
        let name = request.into_inner().name;
        let header = self.change(|record| record.add_role(&name)).await?;
        Ok(Response::new(apb::AuthRoleAddResponse { header }))
    }

    async fn role_get(&self, request: Request<apb::AuthRoleGetRequest>) -> Result<Response<apb::AuthRoleGetResponse>, Status> {
        let who = self.auth.who(request.metadata()).await?;
        let record = self.auth.record();
        let role = &request.get_ref().role;
        // A user may look at the roles it holds, as in etcd.
        let holds = who.user().and_then(|u| record.users.get(u)).is_some_and(|u| u.roles.contains(role));
        if !holds {
            self.auth.require_admin(&who)?;
        }
        let found = record.roles.get(role).ok_or(AuthError::RoleNotFound)?;
        let perm = found
            .permissions
            .iter()
            .map(|p| authpb::Permission { perm_type: p.access.to_etcd(), key: p.key.clone(), range_end: p.range_end.clone() })
            .collect();
        Ok(Response::new(apb::AuthRoleGetResponse { header: self.header().await?, perm }))
    }

    async fn role_list(&self, request: Request<apb::AuthRoleListRequest>) -> Result<Response<apb::AuthRoleListResponse>, Status> {
        self.admin(&request).await?;
        let roles = self.auth.record().roles.into_keys().collect();
        Ok(Response::new(apb::AuthRoleListResponse { header: self.header().await?, roles }))
    }

    async fn role_delete(&self, request: Request<apb::AuthRoleDeleteRequest>) -> Result<Response<apb::AuthRoleDeleteResponse>, Status> {
        self.admin(&request).await?;
        let role = request.into_inner().role;
        let header = self.change(|record| record.delete_role(&role)).await?;
        Ok(Response::new(apb::AuthRoleDeleteResponse { header }))
    }

    async fn role_grant_permission(
        &self,
        request: Request<apb::AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<apb::AuthRoleGrantPermissionResponse>, Status> {
        self.admin(&request).await?;
        let request = request.into_inner();
        let perm = request.perm.ok_or_else(|| Status::invalid_argument("the request grants no permission (perm is empty)"))?;
        let access = Access::from_etcd(perm.perm_type)
            .ok_or_else(|| Status::invalid_argument(format!("permission type {} is not READ, WRITE or READWRITE", perm.perm_type)))?;
        let permission = Permission { access, key: perm.key, range_end: perm.range_end };
        let header = self.change(|record| record.grant_permission(&request.name, permission.clone())).await?;
        Ok(Response::new(apb::AuthRoleGrantPermissionResponse { header }))
    }

    async fn role_revoke_permission(
        &self,
        request: Request<apb::AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<apb::AuthRoleRevokePermissionResponse>, Status> {
        self.admin(&request).await?;
        let request = request.into_inner();
        let header = self.change(|record| record.revoke_permission(&request.role, &request.key, &request.range_end)).await?;
        Ok(Response::new(apb::AuthRoleRevokePermissionResponse { header }))
    }
}
