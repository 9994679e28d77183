//! Olm devices for the client's integration tests: an account with its device key, and a prekey
//! as `POST /keys/claim` hands it out.

use messenger_client::keys::PrivateKey;
use messenger_client::olm::{
    ClaimedPrekey, DeviceAddress, OlmState, SignedPrekey, VerifiedPrekey, verify_prekey,
};
use uuid::Uuid;

pub struct Device {
    pub address: DeviceAddress,
    pub key: PrivateKey,
    pub state: OlmState,
}

/// Device `device_id` of a new account, with a fresh key and Olm account.
pub fn device(device_id: u32) -> Device {
    let address = DeviceAddress::new(Uuid::now_v7(), device_id);
    let key = PrivateKey::generate();
    let state = OlmState::new(address, &key, None).unwrap();
    Device {
        address,
        key,
        state,
    }
}

/// A prekey as `POST /keys/claim` hands it out, verified under the owner's signing key as pinned.
pub fn claim(prekey: &SignedPrekey, last_resort: bool, owner: &Device) -> VerifiedPrekey {
    verify_prekey(
        &ClaimedPrekey {
            key_id: prekey.key_id,
            public_key: prekey.public_key.clone(),
            signature: prekey.signature.clone(),
            last_resort,
        },
        owner.address,
        &owner.state.signing_key(),
    )
    .unwrap()
}
